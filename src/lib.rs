//! Herald: a self-hosted campaign engine with live progress streaming.
//!
//! # Layout
//!
//! - [`domain`]: checked values and rules (phone numbers, templates, the
//!   campaign status machine, API keys). No I/O.
//! - [`store`]: the storage boundary, the [`store::Store`] trait, and its
//!   SQLite implementation. The only place SQL lives.
//! - [`engine`]: workers that claim runs, freeze them into batches and send
//!   each recipient through a provider, with retries, receipts and credits.
//! - [`providers`]: the `Provider` trait and the simulated, webhook and
//!   Twilio providers.
//! - [`api`]: the HTTP layer: routers, extractors, one error type, OpenAPI.
//! - [`startup`]: builds the application and serves it until shutdown.
//! - [`http`]: the accept loop, with the header-read timeout axum's lacks.
//! - [`cli`]: the `herald` command line (serve, keys, bench).
//! - [`bench`]: benchmarks that print figures (never timed tests).
//! - [`telemetry`]: logging set-up.

pub mod api;
pub mod bench;
pub mod cli;
pub mod domain;
pub mod engine;
pub mod http;
pub mod providers;
pub mod retention;
pub mod startup;
pub mod store;
pub mod streams;
pub mod telemetry;
pub mod web;
