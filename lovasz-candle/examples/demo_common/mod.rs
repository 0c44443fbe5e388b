//! Code shared by the two toy demos, `demo_binary` and `demo_multiclass` (the authors'
//! `demo_binary` / `demo_multiclass` notebooks): the command-line options they have in
//! common, random triangle label images, the Adam training loop with its per-iteration
//! history, and the two figures (loss / IoU curves, a grid of label images).
//!
//! Each demo includes this folder with `mod demo_common;`.

pub mod canvas;
pub mod cli;
pub mod curves;
pub mod figures;
pub mod label_grid;
pub mod runtime;
pub mod training;
pub mod triangles;
