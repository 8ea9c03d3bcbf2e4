//! The agent's subcommands besides watching: tools an operator runs by hand.
pub mod inspect;
