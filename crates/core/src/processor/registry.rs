//! The processor registry (as Vector's components `build` themselves): each processor kind
//! a topology may name, and how its node is built: its supplier (a processor per task) and
//! its sources' serdes. `read-state` is registered by default; a program embedding readstate
//! registers its own kinds (`register_supplier`) and compiles and runs topologies that name
//! them.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::api::{ProcessorSupplier, SourceSerdes};
use super::node::BuiltNode;
use super::ProcessorError;
use crate::serde::registry::SchemaResolver;
use crate::serde::{DecodeError, SerdeError};
use crate::topology::{compile_with_kinds, Topology, TopologyError, READ_STATE_KIND};

/// Builds the node of one processor kind for a topology.
pub trait NodeBuilder: Send + Sync {
    /// Make the node (registering output schemas where the kind has any; retried while the
    /// registry is unavailable, until `shutdown`).
    fn build<'a>(
        &'a self,
        topology: &'a Topology,
        resolver: Arc<dyn SchemaResolver>,
        shutdown: &'a AtomicBool,
    ) -> BoxFuture<'a, Result<BuiltNode, ProcessorError>>;
}

/// The built-in kind.
struct ReadStateBuilder;

impl NodeBuilder for ReadStateBuilder {
    fn build<'a>(
        &'a self,
        topology: &'a Topology,
        resolver: Arc<dyn SchemaResolver>,
        shutdown: &'a AtomicBool,
    ) -> BoxFuture<'a, Result<BuiltNode, ProcessorError>> {
        Box::pin(super::node::build(topology, resolver, shutdown))
    }
}

type MakeSupplier = dyn Fn(&Topology) -> Box<dyn ProcessorSupplier> + Send + Sync;

/// A kind whose supplier decodes its own records (its serdes): the source serdes pass raw
/// bytes through, with no schema registry.
struct SupplierBuilder(Box<MakeSupplier>);

impl NodeBuilder for SupplierBuilder {
    fn build<'a>(
        &'a self,
        topology: &'a Topology,
        _resolver: Arc<dyn SchemaResolver>,
        _shutdown: &'a AtomicBool,
    ) -> BoxFuture<'a, Result<BuiltNode, ProcessorError>> {
        let max_record_bytes = topology.bad_records.max_record_bytes;
        Box::pin(async move {
            Ok(BuiltNode {
                supplier: (self.0)(topology),
                serdes: Arc::new(RawSerdes { max_record_bytes }),
            })
        })
    }
}

/// Source serdes of a processor that decodes its records itself.
#[derive(Debug, Clone, Copy)]
pub struct RawSerdes {
    pub max_record_bytes: usize,
}

impl SourceSerdes for RawSerdes {
    fn prepare<'a>(
        &'a self,
        _records: &'a [(&'a str, Option<&'a [u8]>)],
    ) -> BoxFuture<'a, Result<(), SerdeError>> {
        Box::pin(async { Ok(()) })
    }

    fn prepare_ids<'a>(&'a self, _ids: &'a [u32]) -> BoxFuture<'a, Result<(), SerdeError>> {
        Box::pin(async { Ok(()) })
    }

    fn unknown_schema(&self, _topic: &str, _value: Option<&[u8]>) -> Option<u32> {
        None
    }

    fn repartition_key(
        &self,
        topic: &str,
        _value: Option<&[u8]>,
        _key: &mut Vec<u8>,
    ) -> Result<(), DecodeError> {
        Err(DecodeError::Invalid(format!(
            "records of {topic} cannot be repartitioned: their processor decodes them itself (key the source as the processor needs)"
        )))
    }

    fn max_record_bytes(&self) -> usize {
        self.max_record_bytes
    }
}

/// Processor kinds by name.
#[derive(Clone)]
pub struct ProcessorRegistry {
    builders: BTreeMap<String, Arc<dyn NodeBuilder>>,
}

impl Default for ProcessorRegistry {
    fn default() -> Self {
        let mut builders: BTreeMap<String, Arc<dyn NodeBuilder>> = BTreeMap::new();
        builders.insert(READ_STATE_KIND.to_owned(), Arc::new(ReadStateBuilder));
        Self { builders }
    }
}

impl std::fmt::Debug for ProcessorRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.builders.keys()).finish()
    }
}

impl ProcessorRegistry {
    /// Register `kind`, built by `builder`.
    pub fn register(&mut self, kind: &str, builder: impl NodeBuilder + 'static) -> &mut Self {
        self.builders.insert(kind.to_owned(), Arc::new(builder));
        self
    }

    /// Register `kind`, whose processors decode their own records (e.g. a
    /// `processor::typed::TypedSupplier`), made by `make` from the compiled topology.
    pub fn register_supplier(
        &mut self,
        kind: &str,
        make: impl Fn(&Topology) -> Box<dyn ProcessorSupplier> + Send + Sync + 'static,
    ) -> &mut Self {
        self.register(kind, SupplierBuilder(Box::new(make)))
    }

    /// The registered kinds.
    pub fn kinds(&self) -> Vec<&str> {
        self.builders.keys().map(String::as_str).collect()
    }

    /// Compile topology text whose processor is of a registered kind.
    pub fn compile(&self, text: &str) -> Result<Topology, Vec<TopologyError>> {
        compile_with_kinds(text, &self.kinds())
    }

    /// Build the node of `topology`'s processor.
    pub async fn build(
        &self,
        topology: &Topology,
        resolver: Arc<dyn SchemaResolver>,
        shutdown: &AtomicBool,
    ) -> Result<BuiltNode, ProcessorError> {
        let kind = &topology.processor.kind;
        let builder = self
            .builders
            .get(kind)
            .ok_or_else(|| ProcessorError::UnknownKind(kind.clone()))?;
        builder.build(topology, resolver, shutdown).await
    }
}
