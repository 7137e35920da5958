"""Pure numerics: the RTN quantizer, the Marlin and k-packed layouts, the shape rule, the fused C fast path."""
