//! Evaluations of trained models.

pub mod layers;
