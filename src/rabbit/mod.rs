//! The RabbitMQ edge.
pub mod acks;
pub mod consumers;
pub mod dead_letters;
pub mod edge;
pub mod publisher;
pub mod topology;
pub mod wire;
