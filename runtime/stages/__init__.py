"""The SAA+ stages, in the order a frame meets them.

text (captions -> tokens) -> detector (GroundingDINO, P^L) -> regions (the property rules, P^P)
-> segmenter (SAM, with mask_graph's upscaling) -> saliency (the kNN map, P^S, with its kernels)
-> fusion (rescoring and top-K fusion, P^C; mask_fusion does it on the device).
Each stage knows its engines and its rules, never the pipeline that orders them.
"""
