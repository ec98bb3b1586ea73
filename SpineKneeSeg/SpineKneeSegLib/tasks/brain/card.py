"""The brain-wmh card (seed 002)."""
from SpineKneeSegLib.core.labels import BRAIN_LABELS
from SpineKneeSegLib.engine import cards
from SpineKneeSegLib.tasks.brain.phantom import brain_phantom

cards.register(cards.TaskCard(
    name="brain-wmh",
    title="Brain white-matter lesions (FLAIR)",
    description="White-matter / MS lesions on FLAIR with a per-lesion table (seed 002).",
    modality="MR",
    inputs=(cards.InputSpec("flair", "MR", 3, description="FLAIR volume (skull-stripped)", checks=("skull_stripped",)),
            cards.InputSpec("t1", "MR", 3, required=False, description="optional T1, resampled onto FLAIR")),
    preprocessing=cards.Preprocessing(plane="axial", in_plane_spacing_mm=1.0, normalisation="zscore",
                                context_slices=3, min_slices=3, crop_foreground=True),
    # seed 002: 2.5D attention U-Net; 16 base channels (the seed's 32: "channels": (32, 64, 128, 256))
    network=cards.NetworkSpec("unet2d", {"channels": (16, 32, 64, 128), "activation": "relu", "norm": "batch",
                                   "attention": True}),
    weights_entry="brain-wmh",
    weights_with_input=(("t1", "brain-wmh-t1"),),
    labels=BRAIN_LABELS,
    label_activation="sigmoid",  # seed 002: one sigmoid lesion channel
    postprocessors=("lesion_decoding", "lesion_table"),
    warn_missing_labels=False,
    outputs=cards.COMMON_OUTPUTS + ("lesions.tsv", "overlays/"),
    headline=(("lesions", "lesions.lesion_count"), ("lesion load mL", "lesions.total_lesion_load_ml")),
    issue=5,
    phantom=brain_phantom,
))
