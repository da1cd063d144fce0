//! Example ktstr tests live in tests/.
