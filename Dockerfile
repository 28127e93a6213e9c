# Builds the dispatcher binary and a small image that runs it.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin dispatcher

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/dispatcher /usr/local/bin/dispatcher
RUN useradd --system --home /var/lib/dispatcher --create-home dispatcher
USER dispatcher
ENV DISPATCHER_DATA_DIR=/var/lib/dispatcher
ENTRYPOINT ["dispatcher"]
