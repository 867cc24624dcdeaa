//! Integration tests: one binary, each test against a real server on a
//! random port with its own temporary SQLite file.

mod campaigns;
mod cli;
mod contacts;
mod crash;
mod dashboard;
mod engine;
mod helpers;
mod isolation;
mod keys;
mod metrics;
mod providers;
mod python_clients;
mod seeds;
mod streams;
