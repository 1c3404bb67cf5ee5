//! Sluice's data plane.
