//! Fresh on-disk database paths for the SQLite tests (from the shared test kit).
#![allow(unused_imports)]

pub use tokenkeeper_testkit::dirs::{fresh_db, fresh_dir};
