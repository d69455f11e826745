//! An ordered container of named children.

use swa_core::backend::{Backend, BackendResult};
use swa_core::params::{NamedTensors, TensorRole};

use crate::module::{child_name, ForwardInput, ForwardMode, Module, Param};

/// Children run one after the other, PyTorch's `nn.Sequential`: a child's tensors are named
/// `<child name>.<tensor name>`. Children added with [`Sequential::push`] are named by their position
/// (`features.0.weight`), as in PyTorch; [`Sequential::push_named`] gives a child a name of its own
/// (`layer1`, `fc`), which is how networks name their top-level parts.
pub struct Sequential<B: Backend> {
    children: Vec<(String, Box<dyn Module<B>>)>,
}

impl<B: Backend> std::fmt::Debug for Sequential<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.children.iter().map(|(name, _)| name))
            .finish()
    }
}

impl<B: Backend> Default for Sequential<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Backend> Sequential<B> {
    /// An empty container (the identity).
    pub fn new() -> Self {
        Self {
            children: Vec::new(),
        }
    }

    /// Appends a child named by its position.
    pub fn push(&mut self, module: impl Module<B> + 'static) {
        let name = self.children.len().to_string();
        self.children.push((name, Box::new(module)));
    }

    /// Appends a child with its own name.
    pub fn push_named(&mut self, name: impl Into<String>, module: impl Module<B> + 'static) {
        self.children.push((name.into(), Box::new(module)));
    }

    /// Appends a boxed child with its own name.
    pub fn push_boxed(&mut self, name: impl Into<String>, module: Box<dyn Module<B>>) {
        self.children.push((name.into(), module));
    }

    /// The same container with a child appended, named by its position.
    pub fn with(mut self, module: impl Module<B> + 'static) -> Self {
        self.push(module);
        self
    }

    /// The same container with a named child appended.
    pub fn with_named(mut self, name: impl Into<String>, module: impl Module<B> + 'static) -> Self {
        self.push_named(name, module);
        self
    }

    /// The number of children.
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// Whether the container has no children.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// The children's names, in order.
    pub fn child_names(&self) -> impl Iterator<Item = &str> {
        self.children.iter().map(|(name, _)| name.as_str())
    }
}

impl<B: Backend> NamedTensors<B> for Sequential<B> {
    fn visit_tensors(&self, f: &mut dyn FnMut(&str, TensorRole, &B::Tensor)) {
        for (name, child) in &self.children {
            child.visit_tensors(&mut |n, role, t| f(&child_name(name, n), role, t));
        }
    }

    fn visit_tensors_mut(&mut self, f: &mut dyn FnMut(&str, TensorRole, &mut B::Tensor)) {
        for (name, child) in &mut self.children {
            child.visit_tensors_mut(&mut |n, role, t| f(&child_name(name, n), role, t));
        }
    }
}

impl<B: Backend> Module<B> for Sequential<B> {
    /// Each child's output is handed to the next child as an owned input.
    fn forward_input(
        &mut self,
        backend: &B,
        x: ForwardInput<'_, B>,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        let mut children = self.children.iter_mut();
        let Some((_, first)) = children.next() else {
            return x.into_owned(backend);
        };
        let mut y = first.forward_input(backend, x, mode)?;
        for (_, child) in children {
            y = child.forward_owned(backend, y, mode)?;
        }
        Ok(y)
    }

    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        let mut children = self.children.iter_mut().rev();
        let Some((_, last)) = children.next() else {
            return backend.duplicate(dy);
        };
        let mut d = last.backward(backend, dy)?;
        for (_, child) in children {
            d = child.backward(backend, &d)?;
        }
        Ok(d)
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&str, &mut Param<B>)) {
        for (name, child) in &mut self.children {
            child.visit_params_mut(&mut |n, p| f(&child_name(name, n), p));
        }
    }

    fn zero_grads(&mut self) {
        for (_, child) in &mut self.children {
            child.zero_grads();
        }
    }

    /// Only the first child's input is this container's input; the others' are always needed.
    fn require_input_grad(&mut self, required: bool) {
        if let Some((_, first)) = self.children.first_mut() {
            first.require_input_grad(required);
        }
    }

    fn visit_batch_counters(&self, f: &mut dyn FnMut(&str, u64)) {
        for (name, child) in &self.children {
            child.visit_batch_counters(&mut |n, c| f(&child_name(name, n), c));
        }
    }

    fn visit_batch_counters_mut(&mut self, f: &mut dyn FnMut(&str, &mut u64)) {
        for (name, child) in &mut self.children {
            child.visit_batch_counters_mut(&mut |n, c| f(&child_name(name, n), c));
        }
    }
}
