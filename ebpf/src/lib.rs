//! Empty library target: the agent build-depends on this crate so that cargo
//! rebuilds the agent (and its embedded eBPF object) when the crate changes.
#![no_std]
