//! Integration tests: one binary, each test against a real server on a
//! random port with its own fresh database: a temporary SQLite file, or with
//! `HERALD_TEST_BACKEND=postgres` a new database on the server at
//! `HERALD_TEST_POSTGRES_URL` (`./test.sh` runs both passes).

mod campaigns;
mod cli;
mod connections;
mod contacts;
mod crash;
mod crash_matrix;
mod dashboard;
mod engine;
mod fuzz;
mod helpers;
mod isolation;
mod keys;
mod licences;
mod metrics;
mod postgres;
mod process;
mod providers;
mod python_clients;
mod retention;
mod seeds;
mod soak;
mod streams;
mod traces;
