//! Evaluations of trained models.

pub mod exits;
pub mod layers;
pub mod needle;
pub mod needle_gen;
pub mod plot;
pub mod quality;
pub mod recursive;
pub mod speculative;
