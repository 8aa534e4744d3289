//! Minibatch CKA (Nguyen et al. 2021): unbiased HSIC averaged over consecutive minibatches,
//! linear or RBF kernel, constant memory. (Being written.)
