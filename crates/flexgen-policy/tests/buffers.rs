//! The CUDA stage's two bounded buffers, as flexgen-policy sizes them for the memory plan, the
//! planner and the stage alike: every slice of a packed matrix starts on a group and fits the
//! dequantizing buffer (or is one group), the slices cover the matrix, and the prefill scores
//! hold whole cache rows, all of them or as many as fit.

use flexgen_policy::{
    EXPAND_SLICE_VALUES, PREFILL_SCORES_VALUES, expand_slice_outputs, prefill_scores_len,
};
use proptest::prelude::*;

proptest! {
    #[test]
    fn expand_slices_cover_the_matrix_on_group_starts(
        outs in 1usize..200_000,
        ins in 1usize..100_000,
        group in prop::sample::select(vec![16usize, 32, 64, 128]),
    ) {
        let per = expand_slice_outputs(outs, ins, group);
        prop_assert!(per >= 1 && per <= outs);
        // Every slice but the last is `per` outputs, a whole number of groups.
        prop_assert!(per == outs || per.is_multiple_of(group));
        prop_assert!(per * ins <= EXPAND_SLICE_VALUES || per <= group);
        if outs * ins <= EXPAND_SLICE_VALUES {
            // Whole matrices where they fit (also when the last group is partial).
            prop_assert_eq!(per, outs);
        } else {
            // The fewest slices of at most the buffer's outputs (whole groups, at least one).
            let most = (EXPAND_SLICE_VALUES / ins / group).max(1) * group;
            prop_assert_eq!(outs.div_ceil(per), outs.div_ceil(most));
        }
    }

    #[test]
    fn prefill_scores_hold_whole_rows(rows in 1usize..10_000, per_row in 1usize..(1 << 27)) {
        let len = prefill_scores_len(rows, per_row);
        prop_assert!(len.is_multiple_of(per_row));
        let held = len / per_row;
        prop_assert!(held >= 1 && held <= rows);
        prop_assert!(len <= PREFILL_SCORES_VALUES || held == 1);
        // All rows where they fit, else one more row would not.
        prop_assert!(held == rows || (held + 1) * per_row > PREFILL_SCORES_VALUES);
    }
}
