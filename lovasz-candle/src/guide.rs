//! # Coming from PyTorch or TensorFlow
//!
//! Every option of the Lovász losses in the authors' code and in the best-known ports,
//! mapped to this crate's calls, with the behaviours where they differ. `SC` is
//! [`LovaszSoftmaxConfig`](crate::LovaszSoftmaxConfig), `HC`
//! [`LovaszHingeConfig`](crate::LovaszHingeConfig); `..` is `..Default::default()`.
//! Our side of every line is tested: "fixtures" are the authors' own values
//! (`tests/tests/reference.rs`), other names are tests in `lovasz-candle/tests/ports.rs`,
//! `channels_last.rs` or `edge_cases.rs`. The other libraries' behaviour is as their
//! source reads (versions at the end).
//!
//! ## The authors' PyTorch code (`pytorch/lovasz_losses.py`)
//!
//! | theirs | ours | difference (test) |
//! |---|---|---|
//! | `lovasz_softmax(probas, labels)` | `lovasz_softmax(&probas, &labels, &SC::default())` | none: same defaults (present classes, per batch, no ignore) and values (fixtures) |
//! | `classes='present'`, `'all'`, `[a, b]` | `Classes::Present`, `Classes::All`, `Classes::List(vec![a, b])` | none; a listed class counts even when absent, weighing its largest error (`absent_classes_under_all_present_and_a_list`) |
//! | `per_image=True` | `SC { per_image: true, .. }` | an all-void image: theirs returns an empty tensor for it and the mean fails; ours counts it 0 with zero gradient (`an_all_void_image_counts_zero_in_the_per_image_mean`) |
//! | `ignore=255` | `SC { ignore_index: Some(255), .. }` | with exactly one valid pixel theirs fails (`valid.nonzero().squeeze()` is 0-d); ours gives that pixel's loss (`one_valid_pixel_is_the_loss_of_that_pixel`) |
//! | `ignore=None` with labels ≥ C | — | theirs counts such a pixel as background of every class; ours refuses the label until `ignore_index` names it (`a_label_outside_the_classes_needs_ignore_index`) |
//! | all void (`probas.numel() == 0`) | same call | theirs returns `probas * 0.`, an empty `[0, C]` tensor; ours a scalar 0 with zero gradient (`edge_cases::all_void_gives_zero_with_zero_gradient`) |
//! | `lovasz_softmax(probas[B, H, W], labels, classes=[1])` (sigmoid output) | [`lovasz_sigmoid`](crate::lovasz_sigmoid)`(&probas, &labels, &LovaszSigmoidConfig { .. })` | none (fixtures); theirs needs `classes=[1]` here, the default `'present'` raises a `ValueError` |
//! | `lovasz_hinge(logits, labels)` | [`lovasz_hinge`](crate::lovasz_hinge)`(&logits, &labels, &HC::default())` | none: per image by default in both, an all-void image counts 0 (fixtures, `hinge_per_image_and_per_batch`) |
//! | `lovasz_hinge(.., per_image=False, ignore=255)` | `HC { per_image: false, ignore_index: Some(255) }` | none (fixtures) |
//! | `lovasz_grad(gt_sorted)` | [`lovasz_grad`](crate::lovasz_grad)`(&gt_sorted)` | none (fixtures) |
//! | `iou_binary(preds, labels)`, `iou(preds, labels, C)` | [`metrics::iou_binary`](crate::metrics::iou_binary), [`metrics::iou`](crate::metrics::iou) | ours are fractions, theirs percent (fixtures) |
//! | `binary_xloss(logits, labels, ignore)` | [`binary_xloss`](crate::binary_xloss)`(&logits, &labels, ignore)` | none (fixtures) |
//!
//! Their gradient of the Jaccard index is built from `.detach()`ed data (the old
//! `Variable(data)`); so is ours ([`crate`]'s "How the Jaccard gradient is held constant").
//!
//! ## The authors' TensorFlow code (`tensorflow/lovasz_losses_tf.py`)
//!
//! | theirs | ours | difference (test) |
//! |---|---|---|
//! | `lovasz_softmax(probas, labels)`, `order='BHWC'` (the default) | `SC { channels_last: true, .. }` on `[B, H, W, C]` | none on valid input (`channels_last.rs`, the fixtures permuted) |
//! | `order='BCHW'` | `SC::default()` | none |
//! | `'present'` with every pixel void | same call | theirs takes `reduce_mean` of an empty mask (NaN); ours 0 |
//! | `lovasz_hinge(logits, labels)` | `lovasz_hinge(.., &HC::default())` | none |
//!
//! ## segmentation_models_pytorch: `LovaszLoss(mode, per_image=False, ignore_index=None, from_logits=True)`
//!
//! | theirs | ours | difference (test) |
//! |---|---|---|
//! | `mode="multiclass"` | [`lovasz_softmax_with_logits`](crate::lovasz_softmax_with_logits)`(&logits, &labels, &SC { per_image, ignore_index, .. })` | none; smp always applies the softmax (its `from_logits` is not read) and always counts present classes |
//! | `mode="binary"` | `lovasz_hinge(&logits, &labels, &HC { per_image: false, ignore_index })` on `[B, *]` | smp's default is per batch, ours (and the authors') per image: set `per_image: false` (`hinge_per_image_and_per_batch`: 1.25 per batch, 1.0 per image) |
//! | `mode="multilabel"` | `lovasz_hinge(&logits.reshape((b, ()))?, &labels.reshape((b, ()))?, &HC { per_image, .. })` | smp pools every channel into one binary problem; [`lovasz_hinge_multilabel`](crate::lovasz_hinge_multilabel) is the mean of per-channel hinges, a different loss (`multilabel_is_the_channel_mean_and_pooling_is_one_hinge`: 0.75 against 1.0) |
//!
//! ## mmsegmentation: `LovaszLoss(loss_type='multi_class', classes='present', per_image=False, reduction='mean', class_weight=None, loss_weight=1.0)`
//!
//! | theirs | ours | difference (test) |
//! |---|---|---|
//! | `loss_type='multi_class'` (logits, softmax inside) | `lovasz_softmax_with_logits(&logits, &labels, &SC { ignore_index: Some(255), .. })` | mmseg ignores label 255 unless told otherwise; ours ignores nothing by default |
//! | `classes`, `per_image` | `classes`, `per_image` | none |
//! | `per_image=False` | `SC { per_image: false, .. }` | mmseg asserts `reduction='none'` here; ours takes any reduction (a scalar, or `[1]` with `Reduction::None`, `reductions_over_images`) |
//! | `reduction='mean' / 'sum' / 'none'` with `per_image=True` | `Reduction::Mean` / `Sum` / `None` (`[B]`) | none (`reductions_over_images`, `edge_cases::reductions_over_images`) |
//! | `class_weight=[w…]` | `SC { class_weights: Some(vec![w…]), .. }` | mmseg gives `Σ w_c L_c / \|K\|` over the counted classes `K`, ours the weighted mean `Σ w_c L_c / Σ w_c`: multiply ours by `Σ_K w_c / \|K\|` for mmseg's value (`class_weights_are_a_weighted_mean_and_convert_to_mmsegs`) |
//! | `loss_weight=λ`, `avg_factor=k` | `λ * loss`; `Reduction::Sum`, then divide by `k` | no option: one tensor op |
//! | `loss_type='binary'` | `lovasz_hinge(.., &HC { per_image, ignore_index: Some(255) })` | mmseg reads neither `classes` nor `class_weight` here |
//!
//! ## kornia: `lovasz_softmax_loss(pred, target, weight=None)`, `lovasz_hinge_loss(pred, target)`
//!
//! | theirs | ours | difference (test) |
//! |---|---|---|
//! | `lovasz_softmax_loss(pred, target)`: logits `[B, C, H, W]`, C > 1, every class, per image, no ignore | closest: `lovasz_softmax_with_logits(&pred, &target, &SC { classes: Classes::All, per_image: true, .. })` | the values differ: kornia builds each class's Jaccard gradient from the label values (`target_sorted = target_flatten[batch_index, permutations]`) rather than from that class's 0/1 mask. On one 1×2 image of labels `[0, 0]` with class-0 probabilities `[0.9, 0.6]`, the paper's `'all'` loss is 0.325 (ours, `absent_classes_under_all_present_and_a_list`); kornia's formula gives 0.40 |
//! | `weight=w` | `SC { class_weights: Some(w), .. }` | kornia gives `Σ w_c L_c / C`, ours `Σ w_c L_c / Σ w_c` |
//! | `lovasz_hinge_loss(pred[B, 1, H, W], target)`, always per image | `lovasz_hinge(&pred.squeeze(1)?, &target, &HC::default())` | none (`hinge_per_image_and_per_batch`) |
//!
//! ## What this crate adds
//! Class weights for the Lovász-Softmax, reductions over images, any number of spatial
//! dims (`[B, C]`, `[B, C, D, H, W]`), channels-last input, f16 / bf16 / f32 / f64,
//! an all-void image or batch that gives 0 with a zero gradient, and a fused CPU op from
//! logits ([`lovasz_softmax_with_logits`](crate::lovasz_softmax_with_logits)).
//!
//! Versions read: the authors' repository `bermanmaxim/LovaszSoftmax` at `7d48792`,
//! segmentation_models_pytorch at `5006616` (`losses/lovasz.py`), mmsegmentation's
//! `mmseg/models/losses/lovasz_loss.py` (0.x at `13bd768`; 1.x reads the same), kornia at
//! `b4f5a78` (`kornia/losses/lovasz_softmax.py`, `lovasz_hinge.py`).
