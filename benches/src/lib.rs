//! Support code shared by this package's targets.
