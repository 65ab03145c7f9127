"""Regression on scikit-learn's bundled diabetes data (442 patients, 10 features).

Run it with ``fl-keras-run --clients 3 -- -c "model='examples.diabetes.model:build'
dataset='examples.diabetes.data:load'"``.
"""
