//! Seeds derived from counters with SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom
//! number generators", OOPSLA 2014).
//!
//! Every random stream of a run (data order, augmentation, dropout masks, initialisation) is seeded from
//! a pure function of the run's seed and counters such as (epoch, step) or a layer's id, so that a
//! resumed or branched run draws exactly what the uninterrupted one drew. SplitMix64's finaliser is the
//! mixing function: a bijection of `u64` whose outputs for consecutive inputs look unrelated.

/// The increment of SplitMix64's state: 2⁶⁴ divided by the golden ratio, made odd.
pub const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's finaliser (Stafford's "Mix13"): decorrelates consecutive counters.
pub const fn splitmix64_mix(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The output of a SplitMix64 generator whose state was `state` before the step: the state advanced by
/// [`GOLDEN_GAMMA`], then mixed.
pub const fn splitmix64(state: u64) -> u64 {
    splitmix64_mix(state.wrapping_add(GOLDEN_GAMMA))
}

/// Folds `words` into `first`, one SplitMix64 step per word with the word xored into the advanced state:
/// distinct word sequences give unrelated seeds.
pub fn fold_words(first: u64, words: &[u64]) -> u64 {
    words.iter().fold(first, |state, &word| {
        splitmix64_mix(state.wrapping_add(GOLDEN_GAMMA) ^ word)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_matches_the_reference_sequence() {
        // The reference implementation seeded with 0 (Vigna's splitmix64.c) outputs these first.
        let mut state = 0u64;
        let mut outputs = [0u64; 3];
        for output in &mut outputs {
            *output = splitmix64(state);
            state = state.wrapping_add(GOLDEN_GAMMA);
        }
        assert_eq!(
            outputs,
            [
                0xe220_a839_7b1d_cdaf,
                0x6e78_9e6a_a1b9_65f4,
                0x06c4_5d18_8009_454f
            ]
        );
    }

    #[test]
    fn folding_a_word_is_one_generator_step_with_the_word_mixed_in() {
        assert_eq!(fold_words(7, &[]), 7);
        assert_eq!(fold_words(7, &[0]), splitmix64(7));
        assert_ne!(fold_words(7, &[1, 2]), fold_words(7, &[2, 1]));
    }
}
