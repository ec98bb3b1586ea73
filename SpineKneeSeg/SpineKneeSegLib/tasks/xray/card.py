"""The X-ray cards, xray-femur (seed 003) and xray-multiclass (seed 001)."""
import dataclasses

from SpineKneeSegLib.core.labels import (
    XRAY_CHEST_LABELS,
    XRAY_FEMUR_LABELS,
    XRAY_PELVIS_LABELS,
)
from SpineKneeSegLib.engine import cards
from SpineKneeSegLib.tasks.xray.phantom import (
    xray_chest_phantom,
    xray_femur_phantom,
    xray_pelvis_phantom,
)


# X-ray (seeds 001, 003): the radiograph is shown to the network as stored (rows, columns) or, where
# its DICOM header says it is stored turned or mirrored, upright (tasks/xray/orientation.py), cut to
# a square of its longer side centred on the image (aspect ratio kept, the rest padded with the
# normalised minimum) and resampled to network_px x network_px; the output goes back onto the
# input's exact pixels (preprocessing.from_network_grid). Percentile normalisation (0.5-99.5 %)
# makes 8-bit, 12-bit and 16-bit images and any rescale slope/intercept look alike.
def radiograph(what: str, polarity_check: str) -> cards.InputSpec:
    """The one input of an X-ray task; ``polarity_check``: "radiograph_polarity" turns an inverted
    image over (tasks trained on real radiographs), "radiograph_polarity_advice" only warns."""
    return cards.InputSpec("image", "CR/DX", 2, description=f"{what} (DICOM CR/DX, PNG/JPEG/TIFF, 2D NIfTI)",
                           checks=(polarity_check, "radiograph_orientation"), dicom_modalities=PROJECTION_RADIOGRAPHY)


# DICOM modalities of projection X-ray images of the body (radiographs, film, fluoroscopy and
# angiography frames); MG (breast), IO and PX (teeth) are other anatomy
PROJECTION_RADIOGRAPHY = ("CR", "DX", "RG", "RF", "XA")


XRAY_PREPROCESSING = cards.Preprocessing(plane="image", in_plane_spacing_mm=None, normalisation="percentile",
                                   context_slices=1, tile_px=None, network_px=256, crop_mm=None)
# real radiographs: the percentiles of the exposed field only, shutters shown as the field's edge,
# burned-in text clipped (engine.preprocessing.normalise_radiograph; Training/xray_robustness.py
# measures it). The femur / pelvis models keep plain percentiles: their phantoms taught them
# bright shutter bands, and they have not been retrained.
XRAY_FIELD_PREPROCESSING = dataclasses.replace(XRAY_PREPROCESSING, normalisation="percentile-field")

cards.register(cards.TaskCard(
    name="xray-femur",
    title="Proximal femur (X-ray)",
    description="Binary proximal femur on AP pelvis/hip radiographs with femoral-head centre and "
                "diameter (seed 003).",
    modality="CR/DX",
    inputs=(radiograph("2D radiograph", "radiograph_polarity_advice"),),
    preprocessing=XRAY_PREPROCESSING,
    # seed 003: U-Net 32-64-128-128, dropout 0.2, one sigmoid channel (Dice loss, Adam 3e-4,
    # betas 0.8/0.991 in Training/xray.py); a checkpoint may carry a narrower CPU variant
    network=cards.NetworkSpec("unet2d", {"channels": (32, 64, 128, 128), "activation": "relu", "norm": "none",
                                   "dropout": 0.2}),
    weights_entry="xray-femur",
    labels=XRAY_FEMUR_LABELS,
    label_activation="sigmoid",
    # both femurs of a pelvis view are kept, blobs too small to be a femur are not (femur_presence);
    # femoral heads: circle fitted to each femur's boundary
    postprocessors=("remove_small_components", "femur_presence", "area_table", "femoral_heads"),
    outputs=cards.COMMON_OUTPUTS + ("areas.tsv", "femoral_heads.tsv", "femoral_heads.mrk.json", "overlays/"),
    headline=(("femur found", "femur_presence.femur_found"),),
    issue=8,
    phantom=xray_femur_phantom,
))

cards.register(cards.TaskCard(
    name="xray-multiclass",
    title="Pelvis bones (X-ray, multi-class)",
    description="Femur, hip bone and sacrum on AP pelvis radiographs (seed 001: 3 classes; a "
                "checkpoint trained on other classes carries its own label names).",
    modality="CR/DX",
    inputs=(radiograph("2D radiograph", "radiograph_polarity_advice"),),
    preprocessing=XRAY_PREPROCESSING,
    # seed 001: U-Net with batch norm and transposed-convolution upsampling, softmax over
    # background + N classes (Dice + cross-entropy, RMSprop, ReduceLROnPlateau, clipping in Training/)
    network=cards.NetworkSpec("unet2d", {"channels": (32, 64, 128, 128), "activation": "relu", "norm": "batch"}),
    weights_entry="xray-multiclass",
    labels=XRAY_PELVIS_LABELS,
    postprocessors=("remove_small_components", "area_table"),
    outputs=cards.COMMON_OUTPUTS + ("areas.tsv", "overlays/"),
    issue=8,
    phantom=xray_pelvis_phantom,
))

cards.register(cards.TaskCard(
    name="xray-chest",
    title="Chest (X-ray): lungs, heart, clavicles",
    description="Right and left lung, heart and both clavicles on PA chest radiographs (seed 001's "
                "network; trained on the JSRT/SCR radiographs).",
    modality="CR/DX",
    inputs=(radiograph("2D PA chest radiograph", "radiograph_polarity"),),
    preprocessing=XRAY_FIELD_PREPROCESSING,
    # seed 001's U-Net (batch norm, transposed-convolution upsampling); its Dice + cross-entropy in
    # per-structure (sigmoid) form, because the clavicles overlap the lungs and a softmax would
    # give each pixel one structure only (Training/xray_chest.py)
    network=cards.NetworkSpec("unet2d", {"channels": (32, 64, 128, 128), "activation": "relu", "norm": "batch"}),
    weights_entry="xray-chest",
    labels=XRAY_CHEST_LABELS,
    label_activation="sigmoid",
    label_layers=(("clavicles", (4, 5)),),
    # chest_layout: a radiograph stored rotated or flipped gives labels in no chest's layout; where
    # the file does not say which way is up, the layout that passes with the heart toward the left
    # lung is run instead (engine/upright.py), else warned
    # cardiothoracic_ratio: heart width over the thorax's inner width, on the upright labels
    postprocessors=("label_layers", "remove_small_components", "chest_layout", "area_table", "cardiothoracic_ratio"),
    upright_summary="chest_layout",
    outputs=cards.COMMON_OUTPUTS + ("clavicles.nii.gz", "areas.tsv", "chest_measurements.tsv", "overlays/"),
    headline=(("cardiothoracic ratio", "cardiothoracic_ratio.ratio"),),
    issue=24,
    phantom=xray_chest_phantom,
))
