# synthmorph-nipype BIDS App: synthmorph-bids bids_dir output_dir participant|group
#
#   docker build -t synthmorph-nipype .
#   docker run --rm --gpus all -v /data/bids:/data:ro -v /data/out:/out \
#       synthmorph-nipype /data /out participant --use-gpu
#
# Until the package ships its embedded models, give weights: mount them and pass
# --weights /weights/... (or set SYNTHMORPH_WEIGHTS_DIR=/weights).
# The CUDA runtime comes with the torch wheels from PyPI (a plain `pip install torch`
# there pulls the CUDA 12 packages); on a host without a GPU the same image runs on the CPU.
FROM python:3.11-slim-bookworm

ARG VERSION=0.1.0.dev0
LABEL org.opencontainers.image.title="synthmorph-nipype" \
      org.opencontainers.image.description="SynthMorph registration in PyTorch as a BIDS App" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    NIPYPE_NO_ET=1 \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /src
COPY pyproject.toml README.md ./
COPY synthmorph_nipype ./synthmorph_nipype
RUN pip install --no-cache-dir "torch>=2.1" && pip install --no-cache-dir .

RUN useradd --create-home --uid 1000 synthmorph
USER 1000
WORKDIR /home/synthmorph

ENTRYPOINT ["synthmorph-bids"]
CMD ["--help"]
