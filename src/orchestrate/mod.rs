//! `app orchestrate --plan`: run a graph of agent tasks, each in its own instance.

pub mod plan;
