//! A linear pre-scan that refuses pickles serde-pickle could not decode in bounded stack and memory.
//!
//! serde-pickle converts its result recursively, one stack frame per nesting level, and gives
//! every memo reference (GET) its own copy of the memoised value. Deep nesting therefore
//! overflows the stack (10,000 nested lists, about 20 KB, abort a 2 MiB thread), and a few GETs
//! of values that themselves hold GETs build exponentially large results. The scan walks the
//! opcodes once, keeping for each stack entry and memo slot only an upper bound of the value's
//! size (values plus bytes of strings, counting every reference as the copy it becomes) and its
//! nesting depth, and stops at the first opcode that exceeds a limit.
//!
//! The bounds stay exact only while a memoised value no longer changes once something refers to
//! it, so a slot that is written twice, or extended (APPEND, SETITEM, …) after a GET or after it
//! went into another value, is refused. Python's pickler writes each slot once and fills a
//! container before using it; only a container that holds itself breaks that rule, and
//! serde-pickle refuses such recursive values anyway.

use std::collections::HashMap;

use serde_pickle::ErrorCode;

use super::PickleError;

/// Deepest nesting accepted. The scan counts CIFAR files 3 deep (dict, numpy's array state, its
/// dtype state) or 4 where a byte string is a `_codecs.encode` call (protocol 2 from Python 3),
/// since it counts a call as a container of its arguments.
pub const MAX_DEPTH: usize = 64;

/// Size budget per byte of stream: values and string bytes that decoding may build, copies
/// included. A pickle without memo references or DUP builds at most one unit per byte.
pub const SIZE_PER_BYTE: u64 = 4;

/// Size budget of any stream however small (about 4 Mi units, a few hundred MiB at worst).
pub const MIN_SIZE_BUDGET: u64 = 1 << 22;

/// The size and nesting depth a value expands to.
#[derive(Debug, Clone, Copy, Default)]
struct Bound {
    size: u64,
    depth: usize,
}

impl Bound {
    /// Both values side by side: sizes add, the deeper depth counts.
    fn and(self, other: Bound) -> Bound {
        Bound {
            size: self.size.saturating_add(other.size),
            depth: self.depth.max(other.depth),
        }
    }

    /// A container around items of this bound.
    fn wrapped(self) -> Bound {
        Bound {
            size: self.size.saturating_add(1),
            depth: self.depth + 1,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Entry {
    Mark,
    Value(Bound),
    /// A reference to a memo slot, as serde-pickle keeps memoised values on its stack.
    Memo(u32),
}

struct Slot {
    bound: Bound,
    /// Read by a GET or put into another value: from then on it must not change.
    used: bool,
}

/// How an opcode's argument is encoded (pickletools' `ArgumentDescriptor`s).
#[derive(Clone, Copy)]
enum Arg {
    Fixed(usize),
    Line,
    TwoLines,
    /// Little-endian length prefix of 1, 4 or 8 bytes (signed for 4 when `true`), then the data.
    Counted(usize, bool),
}

/// What an opcode does to the stack, as far as sizes and depths go.
#[derive(Clone, Copy)]
enum Effect {
    /// No stack change (PROTO, FRAME).
    Ignore,
    Push,
    Mark,
    Pop,
    PopMark,
    Dup,
    Put,
    Memoize,
    Get,
    /// Pops `n` values into a new container.
    Build(usize),
    /// Pops the values above the last mark (and `n` more) into a new value.
    BuildMarked(usize),
    /// Pops `n` values into the container below them.
    Extend(usize),
    ExtendMarked,
    /// Pops `n` values whose copies make the result (REDUCE, STACK_GLOBAL, NEWOBJ…).
    Call(usize),
    /// BUILD: the state replaces the object.
    SetState,
    Stop,
}

/// The argument encoding and stack effect of each opcode serde-pickle runs, after the table of
/// Python's `pickletools` (protocols 0–5). Persistent IDs, the extension registry and
/// out-of-band buffers (`P Q \x82 \x83 \x84 \x97 \x98`) are refused by serde-pickle and here.
fn opcode(code: u8) -> Option<(Arg, Effect)> {
    use Arg::*;
    use Effect::*;
    Some(match code {
        b'(' => (Fixed(0), Mark),
        b'.' => (Fixed(0), Stop),
        b'0' => (Fixed(0), Pop),
        b'1' => (Fixed(0), PopMark),
        b'2' => (Fixed(0), Dup),
        b'N' | 0x88 | 0x89 | b')' | b']' | b'}' | 0x8f => (Fixed(0), Push),
        b'K' => (Fixed(1), Push),
        b'M' => (Fixed(2), Push),
        b'J' => (Fixed(4), Push),
        b'G' => (Fixed(8), Push),
        b'F' | b'I' | b'L' | b'S' | b'V' => (Line, Push),
        b'c' => (TwoLines, Push),
        b'U' | b'C' | 0x8c | 0x8a => (Counted(1, false), Push),
        b'T' | 0x8b => (Counted(4, true), Push),
        b'X' | b'B' => (Counted(4, false), Push),
        0x8d | 0x8e | 0x96 => (Counted(8, false), Push),
        0x80 => (Fixed(1), Ignore),
        0x95 => (Fixed(8), Ignore),
        b'p' => (Line, Put),
        b'q' => (Fixed(1), Put),
        b'r' => (Fixed(4), Put),
        0x94 => (Fixed(0), Memoize),
        b'g' => (Line, Get),
        b'h' => (Fixed(1), Get),
        b'j' => (Fixed(4), Get),
        0x85 => (Fixed(0), Build(1)),
        0x86 => (Fixed(0), Build(2)),
        0x87 => (Fixed(0), Build(3)),
        b't' | b'l' | b'd' | 0x91 => (Fixed(0), BuildMarked(0)),
        b'i' => (TwoLines, BuildMarked(0)),
        b'o' => (Fixed(0), BuildMarked(1)),
        b'a' => (Fixed(0), Extend(1)),
        b's' => (Fixed(0), Extend(2)),
        b'e' | b'u' | 0x90 => (Fixed(0), ExtendMarked),
        b'R' | 0x93 | 0x81 => (Fixed(0), Call(2)),
        0x92 => (Fixed(0), Call(3)),
        b'b' => (Fixed(0), SetState),
        _ => return None,
    })
}

struct Scan {
    stack: Vec<Entry>,
    memo: HashMap<u32, Slot>,
    /// Size of the copies serde-pickle makes while it runs, and finally of the result.
    copied: u64,
    budget: u64,
    /// Offset of the opcode being scanned.
    offset: usize,
}

/// Refuses `bytes` if decoding it would nest deeper than [`MAX_DEPTH`] or build more than its
/// size budget; also refuses what serde-pickle would refuse before its first value-level check
/// (truncation, unknown opcodes, stack underflow, missing memo slots).
pub fn check(bytes: &[u8]) -> Result<(), PickleError> {
    let mut scan = Scan {
        stack: Vec::new(),
        memo: HashMap::new(),
        copied: 0,
        budget: (bytes.len() as u64)
            .saturating_mul(SIZE_PER_BYTE)
            .max(MIN_SIZE_BUDGET),
        offset: 0,
    };
    let mut pos = 0;
    loop {
        scan.offset = pos;
        let &code = bytes
            .get(pos)
            .ok_or(scan.invalid(ErrorCode::EOFWhileParsing))?;
        let (kind, effect) =
            opcode(code).ok_or(scan.invalid(ErrorCode::Unsupported(code as char)))?;
        let (arg, next) = scan.argument(bytes, pos + 1, kind)?;
        pos = next;
        if scan.apply(effect, kind, arg)? {
            return Ok(());
        }
    }
}

impl Scan {
    fn invalid(&self, code: ErrorCode) -> PickleError {
        PickleError::AtOffset {
            offset: self.offset,
            code,
        }
    }

    /// The argument starting at `pos` and the offset after it.
    fn argument<'b>(
        &self,
        bytes: &'b [u8],
        pos: usize,
        arg: Arg,
    ) -> Result<(&'b [u8], usize), PickleError> {
        let take = |from: usize, len: usize| {
            from.checked_add(len)
                .and_then(|end| Some((bytes.get(from..end)?, end)))
                .ok_or(self.invalid(ErrorCode::EOFWhileParsing))
        };
        let line = |from: usize| {
            let len = bytes
                .get(from..)
                .and_then(|rest| rest.iter().position(|&b| b == b'\n'));
            let len = len.ok_or(self.invalid(ErrorCode::EOFWhileParsing))?;
            Ok((&bytes[from..from + len], from + len + 1))
        };
        match arg {
            Arg::Fixed(len) => take(pos, len),
            Arg::Line => line(pos),
            Arg::TwoLines => {
                let (_, next) = line(pos)?;
                let (_, end) = line(next)?;
                Ok((&bytes[pos..end], end))
            }
            Arg::Counted(width, signed) => {
                let (prefix, data) = take(pos, width)?;
                let mut raw = [0u8; 8];
                raw[..width].copy_from_slice(prefix);
                let len = u64::from_le_bytes(raw);
                if signed && prefix[width - 1] & 0x80 != 0 {
                    return Err(self.invalid(ErrorCode::NegativeLength));
                }
                take(data, usize::try_from(len).unwrap_or(usize::MAX))
            }
        }
    }

    /// Applies one opcode; `true` at STOP.
    fn apply(&mut self, effect: Effect, kind: Arg, arg: &[u8]) -> Result<bool, PickleError> {
        match effect {
            Effect::Ignore => {}
            Effect::Push => self.push(Bound {
                size: 1 + arg.len() as u64,
                depth: 0,
            })?,
            Effect::Mark => self.stack.push(Entry::Mark),
            // POP right after a MARK drops the mark, as in Python.
            Effect::Pop if matches!(self.stack.last(), Some(Entry::Mark)) => {
                self.pop_mark()?;
            }
            Effect::Pop => {
                self.pop()?;
            }
            Effect::PopMark => {
                self.pop_mark()?;
            }
            Effect::Dup => match self.stack.last().copied() {
                Some(Entry::Value(bound)) => {
                    self.copy(bound)?;
                    self.push(bound)?;
                }
                Some(memo @ Entry::Memo(_)) => self.stack.push(memo),
                _ => return Err(self.invalid(ErrorCode::StackUnderflow)),
            },
            Effect::Put => {
                let id = self.slot_id(kind, arg)?;
                self.put(id)?;
            }
            Effect::Memoize => self.put(self.memo.len() as u32)?,
            Effect::Get => {
                let id = self.slot_id(kind, arg)?;
                let slot = self.memo.get_mut(&id).ok_or(PickleError::AtOffset {
                    offset: self.offset,
                    code: ErrorCode::MissingMemo(id),
                })?;
                slot.used = true;
                self.stack.push(Entry::Memo(id));
            }
            Effect::Build(n) => {
                let items = self.pop_n(n)?;
                self.push(items.wrapped())?;
            }
            Effect::BuildMarked(n) => {
                let items = self.pop_mark()?.and(self.pop_n(n)?);
                self.push(items.wrapped())?;
            }
            Effect::Extend(n) => {
                let items = self.pop_n(n)?;
                self.extend_top(items)?;
            }
            Effect::ExtendMarked => {
                let items = self.pop_mark()?;
                self.extend_top(items)?;
            }
            Effect::Call(n) => {
                let inputs = self.pop_n(n)?;
                self.copy(inputs)?;
                self.push(inputs.wrapped())?;
            }
            Effect::SetState => {
                let state = self.stack.pop();
                self.pop()?;
                match state {
                    Some(Entry::Value(bound)) => self.push(bound)?,
                    Some(Entry::Memo(id)) => self.stack.push(Entry::Memo(id)),
                    _ => return Err(self.invalid(ErrorCode::StackUnderflow)),
                }
            }
            Effect::Stop => {
                let result = self.pop()?;
                self.copy(result)?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// A memo slot number: one byte (BINPUT), four little-endian bytes (LONG_BINPUT), or a
    /// decimal line (PUT).
    fn slot_id(&self, kind: Arg, arg: &[u8]) -> Result<u32, PickleError> {
        match (kind, arg) {
            (Arg::Fixed(1), &[byte]) => Ok(byte.into()),
            (Arg::Fixed(4), &[a, b, c, d]) => Ok(u32::from_le_bytes([a, b, c, d])),
            _ => std::str::from_utf8(arg)
                .ok()
                .and_then(|text| text.parse().ok())
                .ok_or(self.invalid(ErrorCode::InvalidLiteral(arg.to_vec()))),
        }
    }

    fn bound_of(&self, entry: Entry) -> Bound {
        match entry {
            Entry::Memo(id) => self
                .memo
                .get(&id)
                .map_or(Bound::default(), |slot| slot.bound),
            Entry::Value(bound) => bound,
            Entry::Mark => Bound::default(),
        }
    }

    /// Checks both limits for a value about to exist.
    fn within_limits(&self, bound: Bound) -> Result<(), PickleError> {
        if bound.depth > MAX_DEPTH {
            return Err(PickleError::TooDeep {
                offset: self.offset,
                limit: MAX_DEPTH,
            });
        }
        if bound.size > self.budget {
            return Err(PickleError::TooLarge {
                offset: self.offset,
                limit: self.budget,
            });
        }
        Ok(())
    }

    fn push(&mut self, bound: Bound) -> Result<(), PickleError> {
        self.within_limits(bound)?;
        self.stack.push(Entry::Value(bound));
        Ok(())
    }

    /// Counts a copy serde-pickle makes against the budget.
    fn copy(&mut self, bound: Bound) -> Result<(), PickleError> {
        self.copied = self.copied.saturating_add(bound.size);
        self.within_limits(Bound {
            size: self.copied,
            depth: bound.depth,
        })
    }

    /// Pops one value; a memo slot popped into another value is used from then on.
    fn pop(&mut self) -> Result<Bound, PickleError> {
        match self.stack.pop() {
            Some(Entry::Mark) | None => Err(self.invalid(ErrorCode::StackUnderflow)),
            Some(entry) => {
                if let Entry::Memo(id) = entry {
                    if let Some(slot) = self.memo.get_mut(&id) {
                        slot.used = true;
                    }
                }
                Ok(self.bound_of(entry))
            }
        }
    }

    fn pop_n(&mut self, n: usize) -> Result<Bound, PickleError> {
        (0..n).try_fold(Bound::default(), |items, _| Ok(items.and(self.pop()?)))
    }

    /// Pops the values above the last mark, and the mark.
    fn pop_mark(&mut self) -> Result<Bound, PickleError> {
        let mut items = Bound::default();
        while !matches!(self.stack.last(), Some(Entry::Mark)) {
            items = items.and(self.pop()?);
        }
        self.stack.pop();
        Ok(items)
    }

    /// Moves the top value into memo slot `id`, leaving a reference to it on the stack.
    fn put(&mut self, id: u32) -> Result<(), PickleError> {
        if self.memo.contains_key(&id) {
            return Err(PickleError::MemoRewritten {
                offset: self.offset,
                slot: id,
            });
        }
        let from_slot = matches!(self.stack.last(), Some(Entry::Memo(_)));
        let bound = self.pop()?;
        if from_slot {
            // serde-pickle copies a memoised value into the new slot.
            self.copy(bound)?;
        }
        self.memo.insert(id, Slot { bound, used: false });
        self.stack.push(Entry::Memo(id));
        Ok(())
    }

    /// Adds `items` to the container on top of the stack (APPEND, SETITEMS, …).
    fn extend_top(&mut self, items: Bound) -> Result<(), PickleError> {
        let offset = self.offset;
        let added = items.wrapped();
        match self.stack.last_mut() {
            Some(Entry::Value(bound)) => {
                *bound = bound.and(added);
                let bound = *bound;
                self.within_limits(bound)
            }
            Some(Entry::Memo(id)) => {
                let id = *id;
                let slot = self.memo.get_mut(&id).ok_or(PickleError::AtOffset {
                    offset,
                    code: ErrorCode::MissingMemo(id),
                })?;
                if slot.used {
                    return Err(PickleError::MemoRewritten { offset, slot: id });
                }
                slot.bound = slot.bound.and(added);
                let bound = slot.bound;
                self.within_limits(bound)
            }
            _ => Err(self.invalid(ErrorCode::StackUnderflow)),
        }
    }
}
