"""Validation and post-processing of half maps: FSC, masks, the FSC suite,
sharpening."""
