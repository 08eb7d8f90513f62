// The constants of gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), tanh(y) =
// y P(y^2) / Q(y^2) for |y| <= 9: the rational approximation of MLAS (and Eigen). One table for
// the scalar twin (decoder_layer.cpp) and the AVX2 / AVX-512 versions, which evaluate P and Q by
// Horner's rule in this order (highest power first).
#pragma once

namespace engine {
namespace gelu_tanh {

constexpr float kSqrt2OverPi = 0.7978845608028654f, kCubic = 0.044715f, kClamp = 9.f;
constexpr float kNum[] = {-2.76076847742355e-16f, 2.00018790482477e-13f, -8.60467152213735e-11f,
                          5.12229709037114e-08f,  1.48572235717979e-05f, 6.37261928875436e-04f,
                          4.89352455891786e-03f};
constexpr float kDen[] = {1.19825839466702e-06f, 1.18534705686654e-04f, 2.26843463243900e-03f,
                          4.89352518554385e-03f};

}  // namespace gelu_tanh
}  // namespace engine
