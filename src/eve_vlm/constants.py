"""Constants shared with the official EVE code (ids must match its checkpoints and data)."""

IMAGE_TOKEN_INDEX = -200  # placeholder id standing for one image inside input_ids
IGNORE_INDEX = -100  # label value excluded from the loss
IMAGE_PLACEHOLDER = "<image>"  # text form of the placeholder
