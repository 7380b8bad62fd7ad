//! omnistage's benchmarks live in `benches/` (`cargo bench -p omnistage-benches`); see README.md.
