"""The knee-bones card (seed 000)."""
from SpineKneeSegLib.core.labels import KNEE_LABELS
from SpineKneeSegLib.engine import cards
from SpineKneeSegLib.tasks.knee.phantom import knee_phantom

cards.register(cards.TaskCard(
    name="knee-bones",
    title="Knee bones (MRI)",
    description="Femur, tibia, fibula and patella in sagittal or coronal knee MRI (seed 000).",
    modality="MR",
    inputs=(cards.InputSpec("image", "MR", 3, description="knee MRI volume, sagittal or coronal (axial: run on "
                                                      "sagittal reformats)"),),
    # seed 000: N4, joint-centred square window, 224 x 224 in-plane, slices kept as acquired (sagittal
    # or coronal), z-score (a checkpoint stores the training population's statistics as "fixed"); an
    # axial series runs on sagittal reformats: the model never saw axial slices (mean Dice 0.14 as
    # acquired, 0.65 reformatted, on synthetic axial series of the held-out anatomy: Training/knee_planes.py)
    preprocessing=cards.Preprocessing(plane="acquisition:sagittal,coronal", in_plane_spacing_mm=None,
                                normalisation="zscore",
                                context_slices=1, min_slices=3, tile_px=None, network_px=224,
                                crop_mm=160.0, crop_window="joint", bias_correction="n4",
                                # an axial series' sagittal reformats are as close as its pixels (0.3-0.6 mm):
                                # every 1.5 mm (view fusion's step), linear between (Training/knee_planes.py)
                                reformat_slice_mm=1.5),
    # seed 000's network is a constant 32 channels ("channels": (32,) * 5, 0.21 M parameters); 16
    # channels (0.05 M, ~4x fewer operations) for the issue's <= 4.5 s network budget on 2 cores
    network=cards.NetworkSpec("unet2d", {"channels": (16, 16, 16, 16, 16), "activation": "elu",
                                   "norm": "batch", "dropout": 0.5}),
    weights_entry="knee-bones",
    labels=KNEE_LABELS,
    # seed 000's separate per-bone fibula model (Training/knee_bones.py --variant fibula), optional:
    # with --aux-weights fibula=FILE its fibula replaces the main network's
    auxiliary=(cards.AuxiliaryModel("fibula", "knee-bones-fibula",
                              cards.NetworkSpec("unet2d", {"channels": (16, 16, 16, 16, 16), "activation": "elu",
                                                     "norm": "batch", "dropout": 0.5}),
                              channels=2, output="labels", seed_variant=True),),
    # plausibility sees the raw network labels too (pipeline.postprocess keeps them), so its
    # component count and raw-vs-final Dice are honest whatever its place in this list
    postprocessors=("fibula_model", "largest_component_per_label", "knee_plausibility", "volume_table"),
    outputs=cards.COMMON_OUTPUTS + ("volumes.tsv", "overlays/"),
    headline=(("plausible", "knee_plausibility.passed"), ("side", "knee_plausibility.knee_side"),
              *((f"{bone} mL", f"knee_plausibility.volumes_ml.{bone}") for bone in ("femur", "tibia", "fibula",
                                                                                  "patella"))),
    issue=6,
    # seed 000's merged "any bone" channel (Training/knee_bones.py --variant merged), split into bones
    label_variants=("multiclass", "merged"),
    phantom=knee_phantom,
))
