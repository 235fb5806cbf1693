// Registration of the medusa_vllm ops with the PyTorch dispatcher.
//
// The ops are reached from Python as torch.ops.medusa_vllm.*; nothing is bound with pybind.
// The shared library is still a Python extension module (medusa_vllm/_C.abi3.so) so that
// `import medusa_vllm._C` loads it and runs the static TORCH_LIBRARY registrations below: the
// module itself is an empty stable-ABI (Py_LIMITED_API) module created by PyInit__C, the
// pattern torch.utils.cpp_extension documents for py_limited_api=True extensions. Being
// abi3, one build loads on every CPython >= 3.10 (torch's floor) with the torch it was built
// against.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(medusa_vllm, m) {
  m.def(
      "tree_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, "
      "Tensor block_table, Tensor seq_lens, Tensor query_start_loc, Tensor tree_masks, "
      "Tensor req_tree_ids, float scale, float softcap, int num_splits) -> ()");
  m.def(
      "move_accepted_kv(Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor slot_mapping, "
      "Tensor query_start_loc, Tensor accepted) -> ()");
  m.def("keyed_uniforms(Tensor keys, int n) -> Tensor");
  m.def(
      "target_probs(Tensor logits, Tensor temperature, Tensor? top_k, Tensor? top_p, "
      "Tensor? min_p) -> Tensor");
  m.def(
      "rejection_walk(Tensor logits, Tensor row_of_node, Tensor children, Tensor drafts, Tensor valid, "
      "Tensor temperature, Tensor? top_k, Tensor? top_p, Tensor? min_p, Tensor accept_u, Tensor final_u) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(medusa_vllm, CPU, m) {
  m.impl("tree_attention", &medusa_vllm::tree_attention_cpu);
  m.impl("move_accepted_kv", &medusa_vllm::move_accepted_kv_cpu);
  m.impl("keyed_uniforms", &medusa_vllm::keyed_uniforms_cpu);
  m.impl("target_probs", &medusa_vllm::target_probs_cpu);
  m.impl("rejection_walk", &medusa_vllm::rejection_walk_cpu);
}

#ifdef MEDUSA_VLLM_WITH_CUDA
TORCH_LIBRARY_IMPL(medusa_vllm, CUDA, m) {
  m.impl("tree_attention", &medusa_vllm::tree_attention_cuda);
  m.impl("move_accepted_kv", &medusa_vllm::move_accepted_kv_cuda);
  m.impl("keyed_uniforms", &medusa_vllm::keyed_uniforms_cuda);
  m.impl("target_probs", &medusa_vllm::target_probs_cuda);
  m.impl("rejection_walk", &medusa_vllm::rejection_walk_cuda);
}
#endif

extern "C" {
// Module init of medusa_vllm._C: an empty module; importing it is what registers the ops.
PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                        // m_name
      "medusa_vllm custom ops, registered as torch.ops.medusa_vllm",  // m_doc
      -1,                                                          // m_size
      nullptr,                                                     // m_methods
  };
  return PyModule_Create(&module_def);
}
}
