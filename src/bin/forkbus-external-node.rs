//! `examples/external_node.rs` as a binary target of the facade crate, so that integration
//! tests find it built (`env!("CARGO_BIN_EXE_forkbus-external-node")`; cargo builds bins,
//! not examples, for `cargo test --test exec`). One source, two targets.

#[path = "../../examples/external_node.rs"]
mod external_node;

fn main() {
    external_node::main();
}
