//! Segmentation data sets.
