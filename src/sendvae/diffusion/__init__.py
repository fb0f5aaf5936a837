"""Latent diffusion for SiT on VAE latents: the flow-matching objective (`transport`), the ODE/SDE samplers
(`sampling`), what a sample run decodes with (`sit_source`) and the sharded, resumable driver that writes
an ADM .npz (`generate.generate`)."""

from .transport import TransportConfig, interpolate, repa_loss, sample_t, training_losses

__all__ = ["TransportConfig", "interpolate", "repa_loss", "sample_t", "training_losses"]
