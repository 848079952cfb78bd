# synthmorph-nipype BIDS App: synthmorph-bids bids_dir output_dir participant|group
#
#   docker build --build-arg VERSION=$(git describe --tags --always) \
#       --build-arg VCS_REF=$(git rev-parse --short HEAD) -t synthmorph-nipype .
#   docker run --rm --gpus all -v /data/bids:/data:ro -v /data/out:/out \
#       synthmorph-nipype /data /out participant --use-gpu
#
# The embedded models are inside the package; FreeSurfer's weights can be mounted and
# given with --weights /weights/... (or SYNTHMORPH_WEIGHTS_DIR=/weights).
# The CUDA runtime comes with the torch wheels from PyPI; on a host without a GPU the
# same image runs on the CPU.
FROM python:3.11-slim-bookworm

ARG VERSION=0.1.0.dev0
ARG VCS_REF=unknown
LABEL org.opencontainers.image.title="synthmorph-nipype" \
      org.opencontainers.image.description="SynthMorph registration in PyTorch as a BIDS App" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    NIPYPE_NO_ET=1 \
    MPLCONFIGDIR=/tmp/matplotlib

# torch first, in a layer of its own: a change of the source does not download it again
RUN pip install --no-cache-dir torch==2.13.0

WORKDIR /src
COPY pyproject.toml README.md ./
COPY synthmorph_nipype ./synthmorph_nipype
# no .git in the build context: the version comes from the build argument
RUN SETUPTOOLS_SCM_PRETEND_VERSION="${VERSION}" pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 synthmorph
USER 1000
WORKDIR /home/synthmorph

ENTRYPOINT ["synthmorph-bids"]
CMD ["--help"]
