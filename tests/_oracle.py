"""An independent numpy/scipy implementation of the default score (docs/algorithm.md, section 4), written from
that description without sharing code with the package: the oracle the torch reference is checked against."""

import numpy as np
import scipy.linalg
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def zscore(x):
    x = x - x.mean(axis=1, keepdims=True)
    return x / x.std(axis=1, keepdims=True)


def knn(x, k):
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    return np.argsort(d2, axis=1, kind="stable")[:, :k]


def adjacency(idx):
    n = idx.shape[0]
    w = np.zeros((n, n))
    for i in range(n):
        w[i, idx[i]] = 1
    return np.maximum(w, w.T)


def laplacian(w):
    return np.diag(w.sum(1)) - w


def is_connected(w):
    return connected_components(coo_matrix(w), directed=False)[0] == 1


def oracle_score(pre, post, k=10, s=32, direction="fwd"):
    z, a = zscore(np.asarray(pre, float)), zscore(np.asarray(post, float))
    wx, wy = adjacency(knn(z, k)), adjacency(knn(a, k))
    assert is_connected(wx) and is_connected(wy), "oracle: pick data with connected kNN graphs"
    if direction == "rev":
        wx, wy = wy, wx
    n = wx.shape[0]
    lx, ly = laplacian(wx), laplacian(wy)
    b = ly + wy.sum(1).mean() / n * np.ones((n, n))
    lam, u = scipy.linalg.eigh(lx, b, subset_by_index=[n - s, n - 1])
    lam, u = lam[::-1], u[:, ::-1]
    rows, cols = np.nonzero(np.triu(wx))
    edge = ((u[rows] - u[cols]) ** 2).sum(1)
    node = np.zeros(n)
    np.add.at(node, rows, edge)
    np.add.at(node, cols, edge)
    node /= wx.sum(1)
    return node / node.max(), lam
