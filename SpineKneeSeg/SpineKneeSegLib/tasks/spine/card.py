"""The lumbar-foramina card (seed 004)."""
from SpineKneeSegLib.core.labels import SPINE_LABELS
from SpineKneeSegLib.engine import cards
from SpineKneeSegLib.tasks.spine.phantom import spine_phantom

cards.register(cards.TaskCard(
    name="lumbar-foramina",
    title="Lumbar levels and foramina (MRI)",
    description="L1-L5 vertebral bodies by level and the ten neural foramina (L1-L5 left/right) "
                "in sagittal lumbar MRI (seed 004).",
    modality="MR",
    inputs=(cards.InputSpec("image", "MR", 3, description="sagittal T1 or T2 lumbar spine MRI"),),
    preprocessing=cards.Preprocessing(plane="sagittal", in_plane_spacing_mm=1.4, normalisation="zscore",
                                context_slices=3, min_slices=3,
                                # the lumbar column fills the middle slices: the ones beyond it are not run
                                # (session 35: the same labels on every shared scan, Testing/benchmarks/
                                # bench_slice_growth.py)
                                grow_min_px=20, column_px=192),
    # seed 004: MultiNet, 3 sagittal slices in, 5 sigmoid level channels out
    network=cards.NetworkSpec("multinet", {"levels": 5, "base_channels": 8, "max_channels": 16, "activation": "elu",
                                     "norm": "batch"}),
    weights_entry="lumbar-levels",
    labels=SPINE_LABELS,
    label_activation="sigmoid",
    auxiliary=(cards.AuxiliaryModel("foramina", "lumbar-foramen-points",
                              cards.NetworkSpec("multinet", {"levels": 5, "base_channels": 8, "max_channels": 16,
                                                       "activation": "elu", "norm": "batch"}), channels=5),
               # redraws the decoded levels' outline at the scan's own pixels (session 28)
               cards.AuxiliaryModel("refiner", "lumbar-level-refiner",
                                    cards.NetworkSpec("level_refiner", {"in_channels": 2, "width": 16}), channels=1,
                                    output="step", fast_skips=False)),
    # transitional reads the raw network labels; level_decoding then names the bodies as one run,
    # level_refinement redraws their outline; volume_table: each body's volume (a cohort stacks them)
    postprocessors=("transitional", "level_decoding", "level_refinement", "largest_component_per_label", "foramina",
                    "volume_table"),
    outputs=cards.COMMON_OUTPUTS + ("foramina.mrk.json", "volumes.tsv", "overlays/"),
    overlay_views="together",  # one mid-sagittal picture of the five levels, not five near copies
    headline=(("level confidence", "level_confidence"), ("doubtful", "level_decoding.doubtful"),
              ("anatomy", "transitional_anatomy.status"), ("foramina", "foramina.found")),
    issue=3,
    phantom=spine_phantom,
))
