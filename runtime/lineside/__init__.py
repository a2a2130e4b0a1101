"""Line-side decisions: thresholds and OK/NG, calibration from good parts, the normal memory
(few-shot) and the streaming memory, and `attach`, which sets them on a pipeline."""
