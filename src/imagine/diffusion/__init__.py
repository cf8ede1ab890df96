"""The diffusion core: schedules, parametrizations, the denoiser wrapper and training losses."""
