//! Helpers shared by the simulator's test files.

#![allow(dead_code)]

use forkbus_router::sim::{Sim, SimRng};

/// Cases per property: `PROPTEST_CASES` when set (for long runs), else the default.
pub(crate) fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Builds a random tree of `n` nodes, each a child of a random earlier one; returns each
/// node's parent.
pub(crate) fn random_tree(sim: &mut Sim, n: usize, seed: u64) -> Vec<Option<usize>> {
    let mut rng = SimRng::new(seed);
    let mut parents = vec![None];
    sim.add_root().expect("valid config");
    for i in 1..n {
        let p = rng.below(i as u64) as usize;
        sim.add_child(p).expect("valid config");
        parents.push(Some(p));
    }
    parents
}
