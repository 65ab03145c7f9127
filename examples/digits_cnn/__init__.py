"""A user's CNN on scikit-learn's bundled 8x8 digits, trained with the user's own Keras callbacks.

Run it with ``fl-keras-run --clients 5 -- -c "model='examples.digits_cnn.model:build'
callbacks='examples.digits_cnn.model:callbacks' callbacks-validation-fraction=0.2 local-epochs=5"``:
the built-in ``digits`` data set (images 8x8x1, ten classes), the user's compiled CNN (its own loss,
metrics and optimizer), and on every client early stopping on the local validation split and a
learning rate that decays with the round.
"""
