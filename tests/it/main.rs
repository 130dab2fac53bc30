//! Integration tests, compiled as one binary so the suite links once.
//!
//! Every test gets its own [`support::TestRepo`] and drives the real `app` binary.

mod activity;
mod api;
mod attack;
mod browser;
mod ci;
mod control;
mod coordination;
mod dash;
mod dashboard;
mod db;
mod doctor;
mod environment;
mod fleet;
mod instance;
mod layers;
mod mcp;
mod orchestrate;
mod output;
mod registry;
mod run;
mod support;
mod torture;
