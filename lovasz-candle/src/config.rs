//! Option structs of the losses, mirroring the reference's keyword arguments
//! (`classes`, `per_image`, `ignore`).

/// Which classes the multiclass Lovász-Softmax averages over (the reference's `classes`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Classes {
    /// Every class `0..C`, including classes absent from the ground truth of a group
    /// (an absent class contributes its largest error).
    All,
    /// Classes with at least one non-void ground-truth pixel in the group (the image when
    /// `per_image`, else the whole batch). The reference's default.
    #[default]
    Present,
    /// An explicit list of class ids, each `< C`; counted whether present or not. A class
    /// listed twice counts twice in the mean, as in the reference.
    List(Vec<usize>),
}

/// How per-image losses are combined when `per_image` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reduction {
    /// The mean over the `B` images (the reference's behaviour). A scalar.
    #[default]
    Mean,
    /// The sum over the `B` images. A scalar.
    Sum,
    /// No reduction: one loss per image, shape `[B]`. Without `per_image` the batch is a
    /// single group and the result is a tensor of shape `[1]`.
    None,
}

/// Options of [`lovasz_softmax`](crate::lovasz_softmax).
///
/// `Default` gives the reference's defaults: `classes = Present`, `per_image = false`,
/// no ignore index, no class weights, mean reduction; channels first.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LovaszSoftmaxConfig {
    /// Classes to average over.
    pub classes: Classes,
    /// Compute the loss per image and average (else one loss for the whole batch).
    pub per_image: bool,
    /// Label value of void pixels, which are left out entirely (the reference's `ignore`).
    pub ignore_index: Option<u32>,
    /// One non-negative weight per class (`C` values). The class mean becomes the weighted
    /// mean `Σ_c w_c L_c / Σ_c w_c` over the counted classes of each group; a group whose
    /// counted classes all have weight 0 contributes 0.
    pub class_weights: Option<Vec<f32>>,
    /// How per-image losses are combined (only matters with `per_image`).
    pub reduction: Reduction,
    /// The class axis is the last one: probabilities (or logits) `[B, *spatial, C]`, as in
    /// TensorFlow's `BHWC` order, instead of `[B, C, *spatial]`. Labels stay
    /// `[B, *spatial]`, and `W` comes in the input's layout. The CPU kernel reads this
    /// layout in place; values and gradients are those of the permuted channels-first
    /// call.
    pub channels_last: bool,
}

/// Options of [`lovasz_hinge`](crate::lovasz_hinge) and
/// [`lovasz_hinge_multilabel`](crate::lovasz_hinge_multilabel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LovaszHingeConfig {
    /// Compute the loss per image and average (the reference's default: `true`).
    pub per_image: bool,
    /// Label value of void pixels.
    pub ignore_index: Option<u32>,
    /// How per-image losses are combined (only matters with `per_image`): the mean (the
    /// reference's), the sum, or none (one loss per image, `[B]`). The multilabel hinge
    /// applies it per channel, then averages over channels.
    pub reduction: Reduction,
}

impl Default for LovaszHingeConfig {
    fn default() -> Self {
        Self {
            per_image: true,
            ignore_index: None,
            reduction: Reduction::Mean,
        }
    }
}

/// Options of [`lovasz_sigmoid`](crate::lovasz_sigmoid). `Default`: per batch, no ignore
/// index (the reference's `lovasz_softmax` defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LovaszSigmoidConfig {
    /// Compute the loss per image and average.
    pub per_image: bool,
    /// Label value of void pixels.
    pub ignore_index: Option<u32>,
    /// How per-image losses are combined (only matters with `per_image`), as for
    /// [`LovaszHingeConfig::reduction`].
    pub reduction: Reduction,
}
