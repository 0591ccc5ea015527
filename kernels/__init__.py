"""Production Triton kernels. Each public function checks its arguments, allocates, launches."""
