"""Weight offload: which decoder layers stay resident (placement), how a layer is packed (layer_layout),
where streamed layers are kept and copied from (copy_engine), the streamer that brings them in before use,
and measured bandwidths for the prediction."""
