//! Mapping tables rendered from the translation code.
