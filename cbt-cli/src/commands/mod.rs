//! One module per command group; each exposes its clap arguments and a `run`-style function.

pub mod backup;
pub mod doctor;
pub mod k8s;
pub mod key;
pub mod maint;
pub mod parse;
pub mod replication;
pub mod repo;
pub mod restore;
