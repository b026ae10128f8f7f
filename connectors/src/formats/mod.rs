//! Record formats, shared by every transport.

pub mod json;
