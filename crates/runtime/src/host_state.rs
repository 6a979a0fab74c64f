//! The bindings' host traits of `memento:operator/state@0.2.0`, over the
//! resources of `state`.

use wasmtime::component::Resource;

use crate::bindings::v2::memento::operator::state::{Host, HostStateReader, HostStateWriter};
use crate::data::InstanceData;
use crate::state::{Piece, StateReader, StateWriter};

impl Host for InstanceData {}

impl HostStateWriter for InstanceData {
    fn write(
        &mut self,
        writer: Resource<StateWriter>,
        key_group: Option<u32>,
        bytes: Vec<u8>,
    ) -> wasmtime::Result<Result<(), String>> {
        let writer = self.table().get_mut(&writer)?;
        Ok(writer.write(key_group, bytes))
    }

    fn drop(&mut self, writer: Resource<StateWriter>) -> wasmtime::Result<()> {
        // The host owns the writer and takes it back after the call; the
        // guest only ever holds a borrow, so there is nothing to drop.
        let _ = writer;
        Ok(())
    }
}

impl HostStateReader for InstanceData {
    fn read(&mut self, reader: Resource<StateReader>) -> wasmtime::Result<Result<Option<Piece>, String>> {
        let reader = self.table().get_mut(&reader)?;
        Ok(reader.read())
    }

    fn drop(&mut self, reader: Resource<StateReader>) -> wasmtime::Result<()> {
        let _ = reader;
        Ok(())
    }
}
