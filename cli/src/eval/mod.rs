//! Evaluations of trained models.

pub mod exits;
pub mod layers;
pub mod plot;
pub mod quality;
pub mod recursive;
