//! ferry gateway
