//! Unit tests of the unpacker internals (name normalization, the table).
