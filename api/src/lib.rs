//! backlog's HTTP API: jobs in, status and artifacts out.
//!
//! The binary (`src/main.rs`) only parses the command line; everything else
//! is here so integration tests can run the real server in-process.

pub mod auth;
pub mod byte_range;
pub mod commands;
pub mod config;
pub mod depth_history;
pub mod enqueuer;
pub mod error;
pub mod extract;
pub mod job_events;
pub mod metrics;
pub mod openapi;
pub mod routes;
pub mod server;
pub mod state;
pub mod streams;
pub mod sweeper;
pub mod ui;
